"""The status surface: `numbers` collects them, `page` renders the HTML page, `routes` serves `GET /`
and `GET /status.json`, `attention` picks the events that need a person."""
