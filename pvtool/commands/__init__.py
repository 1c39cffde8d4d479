"""The `pvtool` subcommands, one module each: `register(sub)` adds the parser, `run(args)` does the work."""
