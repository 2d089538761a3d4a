"""The status surface: `numbers` collects them, `page` renders the HTML page, `routes` serves `GET /`
and `GET /status.json`, `attention` picks the events that need a person, `activity` reads the last
hour per minute and the day's rates for the charts, `charts` turns them into SVG shapes, `campaigns`
makes the campaigns panel's rows."""
