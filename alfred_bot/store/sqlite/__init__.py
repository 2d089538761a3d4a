"""The SQLite engine: SqliteStore and the SQL it runs, one module per concern."""
