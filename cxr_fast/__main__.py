from cxr_fast.cli import main

main()
