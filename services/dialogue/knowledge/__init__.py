"""A tenant's knowledge bases: documents parsed into sections, split into chunks, embedded and stored in Redis
(or memory), and searched at question time by vector similarity fused with BM25 keyword scores.

- `documents`: Markdown, plain text, HTML and PDF into titled sections.
- `chunking`: sections into chunks of a target token size, with an overlap.
- `keywords`: the BM25 keyword index (English words, Chinese character bigrams).
- `store`: `KnowledgeStore`, memory and Redis.
- `ingest`: documents into a knowledge base, skipping unchanged ones by digest.
- `retrieval`: `Retriever`, the top chunks for a question.
"""
