"""Data plane of SLM Fleet Operator: the OpenAI-compatible agent gateway."""
