# Stop the running service, if any. Paths are under $MICROUPDATES_DEVICE_ROOT,
# which is empty on a real device and a directory on a simulated one.
root="${MICROUPDATES_DEVICE_ROOT}"
pid_file="$root/run/hello-service.pid"

if [ -f "$pid_file" ]; then
    pid="$(cat "$pid_file")"
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        echo "stopped hello-service (pid $pid)"
    fi
    rm -f "$pid_file"
else
    echo "hello-service was not running"
fi
