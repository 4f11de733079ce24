from aivax.cli import main

main()
