"""Queries embed-worker's index with RedisVL, as a Python application would.

The query vector comes from the worker itself, so both sides use the same model:

    embed-worker embed "That is a happy person" | python tests/clients/redisvl_query.py

prints the Redis docs' answer, nearest first, in the docs' format:

    ID: doc:0, Distance:0.114169843495, Content:'That is a very happy person'

Options: --url (default redis://127.0.0.1:6379), --index (vector_idx), --vector-field
(embedding), --text-field (content), -k (3).
"""

import argparse
import json
import sys

from redisvl.index import SearchIndex
from redisvl.query import VectorQuery


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379")
    parser.add_argument("--index", default="vector_idx")
    parser.add_argument("--vector-field", default="embedding")
    parser.add_argument("--text-field", default="content")
    parser.add_argument("-k", type=int, default=3)
    args = parser.parse_args()

    line = sys.stdin.readline()
    if not line.strip():
        print("expected one JSON array of floats on stdin", file=sys.stderr)
        return 2
    vector = json.loads(line)

    # The schema (prefix, fields, vector dims and metric) is read back from FT.INFO.
    index = SearchIndex.from_existing(args.index, redis_url=args.url)
    query = VectorQuery(
        vector=vector,
        vector_field_name=args.vector_field,
        return_fields=[args.text_field],
        num_results=args.k,
        dtype="float32",
    )
    for hit in index.query(query):
        print(
            f"ID: {hit['id']}, Distance:{hit['vector_distance']}, "
            f"Content:'{hit.get(args.text_field, '')}'"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
