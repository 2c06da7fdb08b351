"""A sequence file (``user item1 item2 ...``, chronological) as a RecBole atomic ``.inter`` file.

An event's timestamp is its position in the user's sequence, so RecBole's
time ordering reproduces the file's order (as this project's importer does).

    python convert_sequences.py ../shared/data/Beauty.txt WORKDIR/dataset/Beauty/Beauty.inter
"""

import sys
from pathlib import Path


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.parent.mkdir(parents=True, exist_ok=True)
    users = events = 0
    with source.open() as lines, target.open("w") as out:
        out.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in lines:
            user, *items = line.split()
            for position, item in enumerate(items):
                out.write(f"{user}\t{item}\t{position}\n")
            users, events = users + 1, events + len(items)
    print(f"{target}: {users} users, {events} events")


if __name__ == "__main__":
    main()
