"""The thin Typer layer over :mod:`fsteer_export` (installed as the package ``fsteer_cli``)."""
