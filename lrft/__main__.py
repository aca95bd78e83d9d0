from lrft.cli import entry

entry()
