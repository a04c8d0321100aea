from moe_lab.compare import main

if __name__ == "__main__":
    main()
