from kegnet.cli import main

main()
