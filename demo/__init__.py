"""The built-in demo: tiny cipher models, their lm-eval tasks, and the script that builds them."""
