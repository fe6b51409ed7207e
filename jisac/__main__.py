from jisac.cli import main

main()
