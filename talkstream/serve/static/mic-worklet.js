// Microphone capture: the AudioContext runs at 16 kHz, so the samples arrive at the avatar's rate; they are sent
// to the page in blocks of 20 ms (320 samples) as float32.
class MicCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(320);
    this.filled = 0;
  }
  process(inputs) {
    const input = inputs[0];
    if (input && input[0]) {
      const x = input[0];
      for (let i = 0; i < x.length; i++) {
        this.block[this.filled++] = x[i];
        if (this.filled === this.block.length) {
          this.port.postMessage(this.block.slice(0));
          this.filled = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("mic-capture", MicCapture);
