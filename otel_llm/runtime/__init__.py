"""Process concerns: the rank this process is, whether it is a fork, how it is stopped, and logging once."""
