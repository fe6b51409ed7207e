from jisac.cli import exit_now, main

main()
exit_now()
