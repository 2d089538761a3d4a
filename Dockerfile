# Alfred on one small VM: one process, SQLite in /app/data (mount a volume there).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY alfred_bot/ alfred_bot/
COPY handlers/ handlers/
COPY static/ static/
COPY main.py config.toml ./
# Inside a container the server must listen on all interfaces (the port is published by docker).
RUN sed -i 's/^host = "127.0.0.1"/host = "0.0.0.0"/' config.toml && grep -q '^host = "0.0.0.0"' config.toml

RUN useradd --system --uid 10001 alfred && mkdir -p /app/data && chown alfred /app/data
USER alfred
VOLUME ["/app/data"]
EXPOSE 8080

# Secrets come from the environment (docker run -e WHATSAPP_ACCESS_TOKEN=… or an env file).
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
STOPSIGNAL SIGTERM
CMD ["python", "main.py"]
