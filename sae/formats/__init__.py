"""SAEs in other tools' formats: saeflow's SAEs out to SAELens, and SAEs trained elsewhere in
(SAELens directories and Hub releases, EleutherAI sparsify, dictionary_learning), as saeflow SAEs
that compute the same f and x̂. Pure torch and safetensors; `../shared/FORMATS.md` has the layouts.
"""
