from bootsvc.cli import main

main()
