"""`python -m routeproxy lab`: real pptp-linux clients and pptpd inside user-mode Linux.

See docs/lab.md.  `main(argv) -> int` is the command's entry point.
"""


def main(argv=None):
    from routeproxy.lab.cli import main as cli_main

    return cli_main(argv)
