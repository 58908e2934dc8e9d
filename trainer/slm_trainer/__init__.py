"""The trainer that the operator's Jobs run: curate, discover, fine-tune, evaluate, export."""
