"""The topology's agents: each module holds one stage's logic and a factory for its agent.

app.py wires them to topics and tables, so the whole topology reads on one screen there.
"""
