"""The adapter library: many documents absorbed with one base and generator, kept in a folder,
searched, and routed to per token while decoding (PHATGOOSE-style).

Modules, in the order data flows through them:
    entry.py      one entry's files: its state and memory, gates and stored embeddings
    embedding.py  fixed-size embeddings of documents and of texts (lexical, internal, behaviour)
    gates.py      the gates routing scores tokens against ("closed", "centred", "trained")
    routing.py    per-token top-k routing math (Routes), used by the adapted layers
    folder.py     Library: a library folder, its manifest and entries (add, remove, load, merge)
    search.py     Library's routing stacks, embeddings and search (LibraryIndex)
    memory.py     the entries' context memories a routed turn reads (EntryMemories)
    session.py    RoutedSession: a session that answers over a library

Import what you need from its module, e.g. `from genadapter.library.folder import Library`."""
