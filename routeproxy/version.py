"""routeproxy's version, for --version, the start-up line and routeproxy_build_info."""
import platform

from routeproxy import __version__


def versions():
    """{'version', 'twisted', 'python'}: what the daemon reports about itself."""
    try:
        from twisted import __version__ as twisted
    except ImportError:  # pragma: no cover
        twisted = "?"
    return {"version": __version__, "twisted": twisted, "python": platform.python_version()}


def versionLine():
    v = versions()
    return f"routeproxy {v['version']} (Twisted {v['twisted']}, Python {v['python']})"
