"""The PostgreSQL store: several Alfred nodes sharing one database (issue 15)."""
