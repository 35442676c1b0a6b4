"""Local stand-ins for a real cluster, for the demo and the tests: Tansu, and Redis if absent."""
