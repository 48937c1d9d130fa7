"""The device program: the agent loop, the updater and everything that
talks to Docker, the registry and DATA_DIR."""
