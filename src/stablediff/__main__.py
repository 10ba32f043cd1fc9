from stablediff.cli import main

main()
