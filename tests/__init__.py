"""routeproxy's tests (run with trial: `make test`)."""
