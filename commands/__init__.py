"""The command line: `bagel-ft` and its subcommands (the application layer; the libraries below never print or exit).

`commands.main` dispatches; `commands.model` is `bagel-ft model`. The other subcommands' modules are listed in
`commands.main.SUBCOMMANDS`.
"""
