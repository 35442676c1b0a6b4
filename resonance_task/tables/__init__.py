"""The state the agents keep in Faust tables, and the rules for changing it."""
