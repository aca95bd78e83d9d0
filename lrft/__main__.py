from lrft.cli.main import entry

entry()
