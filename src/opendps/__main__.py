from opendps.cli import run

run()
