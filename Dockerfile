# Image for the API and the worker (the same image, different commands).
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY microupdates ./microupdates
RUN pip install --no-cache-dir . && useradd --system --home /var/lib/microupdates microupdates \
    && mkdir -p /var/lib/microupdates/artifacts /var/lib/microupdates/keys \
    && chmod 0700 /var/lib/microupdates/keys && chown -R microupdates /var/lib/microupdates

USER microupdates
ENV MICROUPDATES_DATA_DIR=/var/lib/microupdates
EXPOSE 8080
CMD ["microupdates-api"]
