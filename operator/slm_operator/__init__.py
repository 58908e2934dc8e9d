"""Control loop of SLM Fleet Operator: reconciles AgentTask objects."""
