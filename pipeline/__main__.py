from pipeline._entry import main

main()
