"""metainfluence: influence functions for meta-learning."""
