"""Training data, from rows to batches; one file per job.

========================  ==================================================================================
``rows.py``               one row of text and images -> ``input_ids`` + ``labels`` (``SequenceBuilder``)
``inputs.py``             JSONL / parquet input files -> batches of rows, bounded in memory
``build.py``              the parallel build of a whole sequence folder (``build_dataset``), resumable
``build_folder.py``       the build beside its output, swapped in when complete
``passthrough.py``        the input columns a build carries into the shards unchanged
``shards.py``             the sequence-folder format: schema, both writers, the reader, the manifest
``preferences.py``        preference rows -> prompt / chosen / rejected ids, and their folder's shard layout
``preference_loader.py``  a preference folder read for DPO: pairs, checks, order, batches
``store.py``              a sequence folder as a memory-mapped token store, shared by every rank of a node
``plans.py``              the sampling and packing plan, computed once from lengths and cached with the store
``integrity.py``          checksums of a store's and a cached plan's files, recorded when made, checked on open
``loader.py``             training rows: checks, validation split, weighted sampling, packing, collators
========================  ==================================================================================
"""
