#!/bin/bash
# Start the service from its virtual environment and wait until it is healthy.
# Used as the after command, and as the rollback command to start the restored release.
set -eu
root="${MICROUPDATES_DEVICE_ROOT}"
app="$root/opt/hello-service"
port_file="$root/etc/hello-service/port"
port="$(cat "$port_file" 2>/dev/null || echo 8000)"

# The npm dependency must be resolvable from the application directory.
node -e "require('$app/node_modules/is-number'); console.log('is-number is installed')"

mkdir -p "$root/run" "$root/var/log"
# setsid puts the service in its own session, so it outlives this stage's process group.
HELLO_PORT="$port" setsid "$app/venv/bin/python" "$app/server.py" \
    >>"$root/var/log/hello-service.log" 2>&1 < /dev/null &
echo $! > "$root/run/hello-service.pid"

for _ in $(seq 1 50); do
    if "$app/venv/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
        echo "hello-service $(cat "$app/version.txt") is healthy on port $port"
        exit 0
    fi
    sleep 0.2
done
echo "hello-service did not become healthy on port $port within 10 s" >&2
tail -n 20 "$root/var/log/hello-service.log" >&2 || true
exit 1
