def main():
    print("mmm4rec")
