from spotrun.cli.app import main

main()
