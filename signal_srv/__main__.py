"""``python -m signal_srv`` runs the server."""

from signal_srv.server import main

main()
