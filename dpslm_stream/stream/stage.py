"""The streaming-stage interface: what every stage of both halves shares, declared once.

A stage holds one stream's state between calls and turns input chunks into output that is final the moment it is
returned (never revised):

    push(chunk) -> output       add input; return what became final (possibly empty)
    flush()     -> output       end of stream: return the rest (most stages then reset themselves; StreamingDPDP
                                wants an explicit reset() before the next stream)
    reset()                     forget the stream: the next push starts a new one, as on a fresh stage
    state_nbytes                bytes carried between calls: bounded however long the stream runs, with the
                                stage's bounded settings (tests/test_stream_stages.py measures it)

                                 encoder half                              resynthesis half
    input -> 16 kHz     StreamingResampler      (audio.py)        IncrementalELLAV     units -> codec ids
    conv front-end      StreamingFrontend       (stream/frontend.py)                   (stream/ellav_stage.py)
    11 layers           WindowedEncoder         (stream/encoder.py)     IncrementalVocoder codec ids -> audio
    units               StreamingDPDP           (dpdp.py)                              (stream/vocoder.py)
    ULM log-probs       IncrementalScorer       (models/ulm.py)   StreamingISTFT       spectra -> audio
                        (a StreamState: push, reset and state_nbytes; a score needs no flush)

Inside a worker the heavy stages are driven in split form instead of push (`add` + a plan + a batched runner:
WindowedEncoder with WindowRunner, IncrementalELLAV with BatchDecoder), which computes exactly what push would.
The check below lets mypy (`make typecheck`) prove that every stage implements the interface; the tests use it to
run one set of checks over all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence, TypeVar, runtime_checkable

In = TypeVar("In", contravariant=True)
Out = TypeVar("Out", covariant=True)


@runtime_checkable
class StreamState(Protocol):
    """Per-stream state carried between calls: resettable and measured."""

    def reset(self) -> None:
        """Forget the stream; the next input starts a new one, exactly as on a freshly built stage."""
        ...

    @property
    def state_nbytes(self) -> int:
        """Bytes held between calls (bounded for the stage's bounded settings)."""
        ...


@runtime_checkable
class StreamingStage(StreamState, Protocol[In, Out]):
    """A stream stage: chunks in, final output out (see the module docstring)."""

    def push(self, chunk: In, /) -> Out:
        """Add input; return the output that became final (possibly empty)."""
        ...

    def flush(self) -> Out:
        """End of stream: return the rest of the output."""
        ...


if TYPE_CHECKING:  # mypy checks that every stage implements the interface
    import numpy as np
    from torch import Tensor

    from dpslm_stream.audio import StreamingResampler
    from dpslm_stream.dpdp import Segment, StreamingDPDP
    from dpslm_stream.models.ulm import IncrementalScorer
    from dpslm_stream.stream.ellav_stage import IncrementalELLAV
    from dpslm_stream.stream.encoder import WindowedEncoder
    from dpslm_stream.stream.frontend import StreamingFrontend
    from dpslm_stream.stream.vocoder import IncrementalVocoder, StreamingISTFT

    def _implements(
        resampler: StreamingResampler, frontend: StreamingFrontend, encoder: WindowedEncoder, dpdp: StreamingDPDP,
        scorer: IncrementalScorer, ellav: IncrementalELLAV, vocoder: IncrementalVocoder, istft: StreamingISTFT,
    ) -> tuple[StreamingStage[np.ndarray, Tensor], StreamingStage[Tensor, Tensor], StreamingStage[Tensor, Tensor],
               StreamingStage[Tensor, list[Segment]], StreamState, StreamingStage[Sequence[int], list[int]],
               StreamingStage[Tensor, Tensor], StreamingStage[Tensor, Tensor]]:  # fmt: skip
        return resampler, frontend, encoder, dpdp, scorer, ellav, vocoder, istft
