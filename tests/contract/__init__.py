"""The store contract: every engine (SQLite today) must pass these tests through the public interface."""
