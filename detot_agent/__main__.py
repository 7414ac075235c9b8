"""`python -m detot_agent` runs the `detot` command."""

from detot_agent.cli.app import main

main()
