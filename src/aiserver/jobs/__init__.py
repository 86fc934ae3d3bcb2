"""Jobs: the one lifecycle every generative task goes through."""
