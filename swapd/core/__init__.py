"""The core: the supervisor's loop and everything it owns (children, their processes, the plan)."""
