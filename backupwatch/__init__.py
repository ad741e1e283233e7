"""backupwatch: an event-driven monitor for database backups deposited by remote agents."""

__version__ = "0.1.0"
