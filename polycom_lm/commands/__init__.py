"""One module per `polycom-lm` subcommand (see `polycom_lm.cli`)."""
