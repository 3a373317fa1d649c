"""Helpers shared by the tests: waiting on conditions, kubectl, running the agent."""
