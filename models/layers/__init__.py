from models.layers.composition import ESM2Composition, ESMMComposition
from models.layers.embedding import SharedEmbedding
from models.layers.experts import CGC, ExpertGate
from models.layers.groups import (AuxiliaryTower, DualGroupEmbedding, DynamicParameterTower, GroupClassifier,
                                  GumbelMask)
from models.layers.mlp import MLP
from models.layers.scenario import ParallelMLP, RepeatIntention, ScenarioLearner

__all__ = ["ESM2Composition", "ESMMComposition", "SharedEmbedding", "MLP", "ExpertGate", "CGC",
           "GroupClassifier", "GumbelMask", "DualGroupEmbedding", "AuxiliaryTower", "DynamicParameterTower",
           "ScenarioLearner", "ParallelMLP", "RepeatIntention"]
