from optcli.cli import app

app(prog_name="optcli")
